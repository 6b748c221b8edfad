"""`python -m balancer.sim`: the simulator on its own, with `balancer simulate`'s options."""

from balancer.sim.cli import run

if __name__ == "__main__":
    raise SystemExit(run())
