"""A fedjax_lite FederatedAlgorithm deployed as a Flower App."""
