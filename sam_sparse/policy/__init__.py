"""Mask policies: which block mask each attention layer and head gets, read from and written to YAML
with file:line errors. The built-in policies are sam_sparse/configs/*.yaml."""

from .errors import PolicyError, reject_unknown_keys, type_name, unknown_key_message
from .library import list_policies, load_policy, policy_text
from .patterns import COMBINATORS, PATTERN_KEYS, PATTERNS, Param, PatternDef, PatternSpec
from .policy import RULE_KEYS, TOKEN_ORDERS, TOP_KEYS, Policy, Rule
