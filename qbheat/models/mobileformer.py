"""Mobile-Former (Chen et al., 2022): being written."""
