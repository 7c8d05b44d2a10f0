"""The REARANK reward (normalised nDCG@10 gain plus format terms) and Rank-R1's binary reward. (Built in issue 4.)"""
