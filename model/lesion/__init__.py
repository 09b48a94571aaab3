"""Atiq & Fattah (arXiv:2510.17773): lesion U-Net (dual attention gates, ASPP) and the dual-encoder +
metadata classifier of the seven HAM10000 diagnoses."""
