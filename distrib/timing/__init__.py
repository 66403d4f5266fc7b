"""Where each rank's step time goes, and which rank holds the others back."""
