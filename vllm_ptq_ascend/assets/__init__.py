"""What the package ships or builds itself: the embedded SmolLM2 model, the shipped reasoning text,
and the tiny random models the tests and the demo quantize."""
