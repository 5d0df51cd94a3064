from ao_resampling.cli import main

main()
