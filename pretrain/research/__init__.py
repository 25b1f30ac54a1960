"""Research built on training and benchmarks: baseline-vs-variant comparisons, LR control, Ray Tune
searches, the FIM layout search, continual learning and the demo."""
