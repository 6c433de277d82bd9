"""What the slow and cluster tests drive besides the package: the cluster rehearsals, the
registry page in a real browser, the wheel folder of the GPU check. Imported as
``tests.support.NAME`` (pyproject.toml puts the repository root on pytest's path); the shell
scripts run from here too."""
