"""Local-mode fault tests: real processes killed, frozen and crashed at chosen points."""
