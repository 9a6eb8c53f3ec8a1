from use_search.cli import main

main()
