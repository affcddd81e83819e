"""Datasets in verl's schema (RL prompts, SFT conversations, DPO pairs) and a resumable loader."""

from megarl.data.dpo_dataset import DPODataset, DPODatasetConfig, PreferenceSample
from megarl.data.loader import PromptBatch, PromptDataLoader, ResumableBatchSampler
from megarl.data.records import DataFormatError, read_records
from megarl.data.rl_dataset import PromptSample, RLDataset, RLDatasetConfig
from megarl.data.sft_dataset import SFTDataset, SFTDatasetConfig, SFTSample
from megarl.data.synthetic import ARITH_DATA_SOURCE, arith_records

__all__ = [
    "ARITH_DATA_SOURCE",
    "DPODataset",
    "DPODatasetConfig",
    "DataFormatError",
    "PreferenceSample",
    "PromptBatch",
    "PromptDataLoader",
    "PromptSample",
    "RLDataset",
    "RLDatasetConfig",
    "ResumableBatchSampler",
    "SFTDataset",
    "SFTDatasetConfig",
    "SFTSample",
    "arith_records",
    "read_records",
]
