"""The simulation harness: in-process engine, Ray engine adapter, synthetic demo data."""
