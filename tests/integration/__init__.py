"""The integration tests, a package so that their modules (``integration.test_dmsa``) never collide
with the unit tests of the same name in ``tests/`` under pytest's default import mode."""
