-- Select and reserve in one round trip: refill every candidate region's buckets, pick
-- one with policy.pick (lib.lua) using the caller's random number, reserve there.
-- KEYS[i]   the bucket of candidate i (all share the model's hash tag: one slot)
-- ARGV      cost, r, ttl, the candidates' limits (see parse_limits)
-- Returns   {i, failures} with the 1-based index reserved and that region's consecutive
--           failures (a success only needs record_success when > 0), or {0, retry_after}.

local cost = tonumber(ARGV[1])
local r = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local limits = parse_limits(ARGV[4])
local n = #KEYS
local now = clock()

local buckets, levels = {}, {}
for i = 1, n do
  buckets[i] = load(KEYS[i], limits[i], now)
  levels[i] = level_of(buckets[i], now)
end

local index = pick(limits, levels, n, cost, r)
if index < 0 then
  return { 0, fmt(retry_after(limits, levels, n, cost)) }
end
-- Only the chosen bucket is written: the others' refill is implied by their stamps.
local b = buckets[index]
b.tokens = b.tokens - cost
b.requests = b.requests - 1
save(KEYS[index], b, now, ttl)
return { index, string.format('%d', b.failures) }
