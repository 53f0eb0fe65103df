from runplane_cli.main import main

main()
