"""The reference world: drives logged from the highway-env simulator, driven by its rule-based expert, seen through
an on-board perception that degrades at night, in rain and in glare at a tunnel exit.

    from sim.config import FleetConfig
    from sim.fleet import simulate_fleet
    summary = simulate_fleet(FleetConfig(vehicles=8, drives_per_vehicle=4), "data/drives")

Modules: `config` (every number that shapes a drive), `env` (highway-env scenes with the expert ego, the lane
context the fleet logs), `perception` (the degradation model), `frames` (the one builder of the frame contract's
columns from a scene), `fleet` (drives and fleets, cached), `truth` (the simulator's truth beside each drive).

Used by the demo, the benchmarks and the retraining cycle's closed loop; nothing in `ingest` depends on it.
"""
