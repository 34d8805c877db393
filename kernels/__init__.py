"""DPC-KNN kernel family (Triton) with plain-PyTorch references in `dynfocus_kernels.reference`."""
