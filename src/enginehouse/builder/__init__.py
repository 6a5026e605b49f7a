"""Engine builder: build specs, builders per backend, the content-addressed cache."""
