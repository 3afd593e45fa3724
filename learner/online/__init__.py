"""The streaming loop around the learner: trainer, Ray actor, publishing, publish gate, prequential tallies, drift."""
