from igops.cli import main

main()
