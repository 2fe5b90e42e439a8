"""The reference service embedding the engine, and the Locust scenarios that load it."""
