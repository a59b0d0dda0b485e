from flexemrd.cli import main

main()
