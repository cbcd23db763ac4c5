"""Dataset generators and readers: toy datasets in the real on-disk formats, Fashion-MNIST."""
