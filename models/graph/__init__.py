"""Graph neural network building blocks on jraph `GraphsTuple`s shared by several papers."""
