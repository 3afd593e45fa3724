"""The model and one step of learning: config, encoder, transfer, losses, prototypes, ``SITNLearner``, checkpoint files."""
