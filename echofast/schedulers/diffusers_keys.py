"""The config keys of diffusers' scheduler classes, for telling diffusers' own keys from typos.

diffusers copies a source class's keys into a converted config and saves them (the Stable
Diffusion 2.x ``DDIMScheduler`` config carries PNDM's ``skip_prk_steps``), so a config naming
our class may hold keys of other scheduler classes. diffusers is no dependency of echofast: the
table is fixed here; ``tests/schedulers/test_diffusers_keys.py`` checks it against the installed
diffusers.
"""

from __future__ import annotations

DIFFUSERS_SCHEDULER_KEYS_VERSION = "0.42.1"
"""The diffusers version :data:`DIFFUSERS_SCHEDULER_KEYS` was taken from."""

REMOVED_CLASS_KEYS: frozenset[str] = frozenset({"dtype"})
"""Keys only classes that diffusers has since removed had: the Flax schedulers' ``dtype``
(diffusers 0.35.2 still ships them)."""

DIFFUSERS_SCHEDULER_KEYS: frozenset[str] = (
    frozenset(
        """
    algorithm_type alpha_cum_end alpha_cum_start base_image_seq_len base_shift beta_end beta_max
    beta_min beta_schedule beta_start block_length clip_denoised clip_sample clip_sample_range
    correct_steps corrector_k corrector_order corrector_selection corrector_selection_tau
    corrector_steps disable_corrector dynamic_thresholding_ratio editing_threshold entropy_bound
    eps eta euler_at_final final_sigmas_type final_step_size_scale flow_shift gamma gamma_cum_end
    gamma_cum_start interpolation_type invert_sigmas lambda_min_clipped lower_order_final
    mask_token_id masking_schedule max_image_seq_len max_shift minimal_topk n_grid noise_mode
    noise_sampler_seed num_inference_steps num_policy_substeps num_train_timesteps num_vec_classes
    original_inference_steps predict_x0 prediction_type predictor_order rescale_betas_zero_snr rho
    s s_churn s_max s_min s_noise sample_max_value sampling_eps scale_factors scaler schedule_mode
    scheduler_type set_alpha_to_one shift shift_terminal sigma_data sigma_max sigma_min
    sigma_schedule skip_prk_steps snr snr_shift_scale solver_order solver_p solver_type stage_range
    stages steps_offset stochastic_sampling t_lim_ode t_lim_ode_below t_max t_min
    tail_step_multiplier tail_steps tau_func threshold thresholding time_shift_type
    timestep_scaling timestep_spacing timestep_type trained_betas tsr_k tsr_sigma upscale_mode
    use_beta_sigmas use_dynamic_shifting use_exponential_sigmas use_flow_sigmas use_karras_sigmas
    use_lu_lambdas variance_type
    """.split()
    )
    | REMOVED_CLASS_KEYS
)
"""Every ``__init__`` (config) key of diffusers' scheduler classes (those of
``diffusers/schedulers/scheduling_*.py``, the deprecated ones and those behind optional
dependencies included) as of diffusers :data:`DIFFUSERS_SCHEDULER_KEYS_VERSION`, and the keys of
classes removed since: :data:`REMOVED_CLASS_KEYS`."""
