# The cluster's GPU stack, pinned as one pair: the image's NVIDIA driver and torch's CUDA build.
# Sourced by scripts/setup.sh when RAYTRAIN_AT_GPU_STACK names this file (cluster.yaml's
# setup_commands do; a laptop, CI and the local twin install torch from their own registry).
# Table in docs/cluster.md ("The GPU stack"); tests/test_setup_scripts.py checks the pair.
#
# The image: AWS Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04), cluster.yaml's
# ImageId (one anchor, &dlami). The release this pair was chosen for and the driver it carries
# (AWS's release notes of the 20261006 Base OSS Ubuntu 22.04 images: driver 595.91.07, CUDA
# stacks 12.8-13.2, EFA installer 1.50.0, aws-ofi-nccl 1.21.1 under /opt/amazon/ofi-nccl).
RAYTRAIN_AT_DLAMI_RELEASE=20261006
# Its name in EC2 (scripts/cluster/pin_ami.sh looks the release up by it in your region).
RAYTRAIN_AT_DLAMI_NAME="Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) $RAYTRAIN_AT_DLAMI_RELEASE"
RAYTRAIN_AT_DLAMI_DRIVER=595.91.07
# torch's CUDA build: the tested torch (the one `make setup` installs here) from PyTorch's CUDA
# 13.0 wheel index. Its kernels need a driver of CUDA 13.0's branch or newer: NVIDIA's CUDA 13.0
# release notes give >= 580.65.06 (drivers run older CUDA builds, never newer ones), so a later
# image (a newer driver) keeps this build working and an older one is refused at set-up.
RAYTRAIN_AT_TORCH_CUDA=13.0
RAYTRAIN_AT_TORCH_INDEX=https://download.pytorch.org/whl/cu130
RAYTRAIN_AT_TORCH_VERSION=2.14.1
RAYTRAIN_AT_TORCHVISION_VERSION=0.29.1
RAYTRAIN_AT_TORCH_MIN_DRIVER=580.65.06
