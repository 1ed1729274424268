from zevents.cli import main

main()
