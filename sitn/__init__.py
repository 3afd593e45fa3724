"""sitn-stream: streaming cross-domain recommender."""
