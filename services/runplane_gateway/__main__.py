from runplane_gateway.main import main

main()
