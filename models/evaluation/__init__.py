"""Evaluation: the reference protocol and scorer, open-set figures per rule, embedding a data set, the speed bench."""
