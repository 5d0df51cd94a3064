"""The pieces more than one stage uses, below the stages: a stage imports no sibling stage, only these.

sampling.py (the loaded model, the plan's decoding, the sampler and its stored answers), prompts.py (the judge's
prompts for the AO answers and the target model's replies), judge_prompt.py (reply schemas, parsers, the plan of owed
calls), judge_calls.py (the client call and the concurrent loop) and spreads.py (the judge-free spread figures).
Nothing here imports a stage (tests/unit/test_architecture.py).
"""
