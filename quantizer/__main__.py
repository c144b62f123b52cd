from quantizer.cli.main import main

main()
