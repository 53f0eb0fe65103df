from runplane_autoscaler.main import main

main()
