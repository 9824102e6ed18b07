"""The joint classifier-discriminator: the network and its readings (model), the training objectives
(losses), PGD (attacks), and adversarial training (config, training)."""
