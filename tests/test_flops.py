import torch

from cmboost.demo.flops import booster_step_flops, count_flops


def test_a_booster_step_counts_the_forward_and_the_backward_to_the_image_only():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1, bias=False), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 8 * 8, 10, bias=False))
    conv, linear = 2 * 4 * 1 * 9 * 8 * 8, 2 * (4 * 8 * 8) * 10  # multiply-adds of each layer, as 2 operations
    # forward, then the gradient with respect to the input through both layers; no weight gradients
    assert booster_step_flops(net, (1, 8, 8)) == 2 * (conv + linear)
    assert all(p.requires_grad for p in net.parameters())  # the caller's network is left as it was
    assert count_flops(lambda: net(torch.rand(3, 1, 8, 8))) == 3 * (conv + linear)  # per image, times 3
