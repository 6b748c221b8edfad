-- Read every candidate region of a model, refilled to now, without writing.
-- KEYS[i]  the bucket of candidate i;  ARGV[1]  their limits (see parse_limits)
-- Returns  7 strings per candidate: tokens, requests, cooldown seconds, failures, tripped,
--          learned factor, smoothed latency.

local limits = parse_limits(ARGV[1])
local now = clock()
local out = {}
for i = 1, #KEYS do
  local b = load(KEYS[i], limits[i], now)
  local level = level_of(b, now)
  out[#out + 1] = fmt(level.tokens)
  out[#out + 1] = fmt(level.requests)
  out[#out + 1] = fmt(level.cooldown)
  out[#out + 1] = string.format('%d', b.failures)
  out[#out + 1] = string.format('%d', b.tripped)
  out[#out + 1] = fmt(b.factor)
  out[#out + 1] = fmt(b.lat)
end
return out
