"""Building the shipped zoo (training the base and the experts, calibrating, shipping): not part
of the installed package; scripts/build_zoo.py runs it."""
