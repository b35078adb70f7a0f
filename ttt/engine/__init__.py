"""The fast TTT-NN engine: mixed precision, several documents at once, equal to ttt.train's loop."""
