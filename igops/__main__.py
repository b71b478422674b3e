from igops.launcher import main

main()
