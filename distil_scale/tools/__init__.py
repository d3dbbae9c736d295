"""Tools around the core: the bench (speed, memory, data, inference tables), the memory
planner, the GPU check and the reproduction study. The core (train/, engine/, data/, glue/)
never imports them."""
