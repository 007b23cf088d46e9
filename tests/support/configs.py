"""Model configs used by the tests: the full EchoNet-Synthetic ones (spec) and small ones."""

VAE_FULL_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 256, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 112,
}

LIDM_FULL_CONFIG = {
    "sample_size": 14,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"],
    "block_out_channels": [128, 256, 256, 512],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "time_embedding_type": "positional",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_type": "resnet",
    "upsample_type": "resnet",
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
}

VAE_SMALL_CONFIG = {
    **VAE_FULL_CONFIG,
    "block_out_channels": [32, 32, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 24,
}

LIDM_SMALL_CONFIG = {
    **LIDM_FULL_CONFIG,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
}

LVDM_FULL_CONFIG = {
    "sample_size": 14,
    "in_channels": 8,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"],
    "up_block_types": ["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3,
    "block_out_channels": [128, 256, 256, 512],
    "addition_time_embed_dim": 1,
    "projection_class_embeddings_input_dim": 1,
    "layers_per_block": 2,
    "cross_attention_dim": 1,
    "transformer_layers_per_block": 1,
    "num_attention_heads": [8, 16, 16, 32],
    "num_frames": 64,
}

LVDM_SMALL_CONFIG = {
    **LVDM_FULL_CONFIG,
    "block_out_channels": [32, 64, 64, 64],
    "num_attention_heads": [2, 4, 4, 4],
    "num_frames": 8,
}
