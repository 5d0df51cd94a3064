"""ao-resampling: how much does an Activation Oracle's answer change when you just sample it again?"""
