"""Score modifiers: functions of (score, b, h, q, k) -> score, FlexAttention's ``score_mod`` signature."""
