"""QEMU's mpqemu link (x-pci-proxy-dev to x-remote): the codec, the record of
what a new remote process needs, and the relay that keeps the link whole
while remote processes come and go."""
