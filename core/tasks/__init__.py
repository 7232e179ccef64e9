"""Task families: the stages every pipeline of one kind (image or text classification) shares."""
