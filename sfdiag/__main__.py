from sfdiag.cli import main

main()
