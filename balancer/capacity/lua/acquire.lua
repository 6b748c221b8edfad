-- Select and reserve in one round trip: refill every candidate region's buckets, pick
-- one with policy.pick (lib.lua) using the caller's random number, reserve there.
-- KEYS[i]   the bucket of candidate i (all share the model's hash tag: one slot); with a
--           queue, two more: the model's queue (ZSET ticket -> order) and its tickets
--           (HASH ticket -> "deadline cost")
-- ARGV      cost, r, ttl, the candidates' limits (see parse_limits); with a queue also
--           ticket, boost (seconds of head start), budget (seconds it may still wait)
-- Returns   {i, failures, level} with the 1-based index reserved, that region's
--           consecutive failures (a success only needs record_success when > 0) and the
--           tokens left after the reservation; or {0, wait, position, queued}.

local cost = tonumber(ARGV[1])
local r = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local limits = parse_limits(ARGV[4])
local queueing = ARGV[5] ~= nil
local n = #KEYS
if queueing then n = n - 2 end
local now = clock()

local buckets, levels, effs = {}, {}, {}
for i = 1, n do
  buckets[i] = load(KEYS[i], limits[i], now)
  levels[i] = level_of(buckets[i], now)
  effs[i] = buckets[i].eff
end

-- The queue: who is waiting ahead of this request? (as MemoryStore.acquire)
local qkey, tkey, ticket, order, ahead, ahead_cost = nil, nil, nil, 0, 0, 0
if queueing then
  qkey, tkey, ticket = KEYS[n + 1], KEYS[n + 2], ARGV[5]
  -- Waiters past their deadline (gone, or their replica crashed) leave from the head.
  for _ = 1, 64 do
    local head = redis.call('ZRANGE', qkey, 0, 0)
    if #head == 0 then break end
    local info = redis.call('HGET', tkey, head[1])
    local deadline = info and tonumber(string.match(info, '^(%S+)')) or 0
    if deadline >= now then break end
    redis.call('ZREM', qkey, head[1])
    redis.call('HDEL', tkey, head[1])
  end
  local mine = redis.call('ZSCORE', qkey, ticket)
  order = mine and tonumber(mine) or (now - tonumber(ARGV[6]))
  local before = redis.call('ZRANGEBYSCORE', qkey, '-inf', '(' .. fmt(order))
  ahead = #before
  for _, other in ipairs(before) do
    local info = redis.call('HGET', tkey, other)
    ahead_cost = ahead_cost + (info and tonumber(string.match(info, '%S+$')) or 0)
  end
end

local index = -1
if ahead == 0 then index = pick(effs, levels, n, cost, r) end
if index > 0 then
  if queueing then
    redis.call('ZREM', qkey, ticket)
    redis.call('HDEL', tkey, ticket)
  end
  -- Only the chosen bucket is written: the others' refill is implied by their stamps.
  local b = buckets[index]
  b.tokens = b.tokens - cost
  b.requests = b.requests - 1
  save(KEYS[index], b, now, ttl)
  return { index, string.format('%d', b.failures), fmt(b.tokens) }
end

local wait = retry_after(effs, levels, n, cost)
if not queueing then
  return { 0, fmt(wait), 0, 0 }
end
if ahead > 0 then
  wait = math.max(wait, queue_wait(ahead_cost, cost, effs, levels, n))
end
local budget = tonumber(ARGV[7])
if budget <= 0 then
  redis.call('ZREM', qkey, ticket)
  redis.call('HDEL', tkey, ticket)
  return { 0, fmt(wait), ahead, 0 }
end
redis.call('ZADD', qkey, fmt(order), ticket)
redis.call('HSET', tkey, ticket, fmt(now + budget) .. ' ' .. string.format('%d', cost))
local keep = string.format('%d', math.max(ttl, math.ceil(budget) + 1))
redis.call('EXPIRE', qkey, keep)
redis.call('EXPIRE', tkey, keep)
return { 0, fmt(wait), ahead, 1 }
