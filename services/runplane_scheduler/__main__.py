from runplane_scheduler.main import main

main()
