"""One reader per kind of source: ``idx`` (MNIST, Fashion-MNIST, KMNIST, read in place),
``torchvision_sets`` (CIFAR-10, SVHN), ``folder`` (a folder per class) and ``npz`` (arrays)."""
