from runplane_node_agent.main import main

main()
