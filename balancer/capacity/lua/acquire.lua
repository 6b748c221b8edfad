-- Select and reserve in one round trip: refill every candidate region's buckets, pick
-- one with policy.pick (lib.lua) using the caller's random number, reserve there; with a
-- client, check and charge its budget and hold it to its fair share first (tenants.lua).
-- KEYS[i]   the bucket of candidate i (all share the model's hash tag: one slot); with a
--           reservation id, its record; with a client, two more: its budget and the
--           model's fair-share book; with a queue, two more: the model's queue (ZSET
--           ticket -> order) and its tickets (HASH ticket -> "deadline cost")
-- ARGV      cost, r, ttl, the candidates' limits (see parse_limits), the client's limits
--           ("" for none), its name, demand ("1": count the cost as asked), the
--           reservation id ("" for none) and how long its record lives (release.lua);
--           with a queue also ticket, boost (seconds of head start), budget (seconds it
--           may still wait)
-- Returns   {i, failures, level, granted, now[, tokens, requests, day_used, month_used]}
--           with the 1-based index reserved, that region's consecutive failures (a success
--           only needs record_success when > 0), the tokens left after the reservation,
--           the tokens ever reserved there, the server's time and the client's budget
--           levels after it; or {0, wait, position, queued, reason}.

local cost = tonumber(ARGV[1])
local r = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local limits = parse_limits(ARGV[4])
local client = nil
if ARGV[5] ~= '' then client = parse_client(ARGV[5]) end
local rid = ARGV[8]
local queueing = ARGV[10] ~= nil
local n = #KEYS
if queueing then n = n - 2 end
if client then n = n - 2 end
if rid ~= '' then n = n - 1 end
local now = clock()

-- A reservation its replica gave up on (the reply was late: release.lua) never happens.
local rkey = nil
if rid ~= '' then
  rkey = KEYS[n + 1]
  if redis.call('GET', rkey) == 'released' then return { 0, '0', 0, 0, 'released' } end
end

local buckets, levels, effs = {}, {}, {}
for i = 1, n do
  buckets[i] = load(KEYS[i], limits[i], now)
  levels[i] = level_of(buckets[i], now)
  effs[i] = buckets[i].eff
end

-- The client: its budget, then its fair share (ClientBook.admit).
local ckey, fkey, budget, book, me, held, start = nil, nil, nil, nil, nil, false, nil
local fair_wait_s = 0.0
if client then
  ckey, fkey = KEYS[#KEYS - 1], KEYS[#KEYS]
  if queueing then ckey, fkey = KEYS[#KEYS - 3], KEYS[#KEYS - 2] end
  budget = load_budget(ckey, client, now)
  local reason, wait = budget_refusal(client, budget, cost)
  if not reason then reason, wait = quota_refusal(client, budget, cost, now) end
  if reason then
    if queueing then
      redis.call('ZREM', KEYS[#KEYS - 1], ARGV[10])
      redis.call('HDEL', KEYS[#KEYS], ARGV[10])
    end
    return { 0, fmt(wait), 0, 0, reason }
  end
  if client.fair_window > 0 then
    local window = client.fair_window
    local pool_rate = 0.0
    for i = 1, n do pool_rate = pool_rate + effs[i].tokens_rate end
    book, me = load_book(fkey, ARGV[6], now, window)
    book, me = fair_entry(book, me, ARGV[6], client.weight, now)
    if ARGV[7] == '1' then book[me].demand = book[me].demand + cost end
    local cap = fair_cap(book, me, pool_rate, window, client.fair_headroom)
    if ARGV[7] == '1' then
      local active = {}
      for _, e in ipairs(book) do
        if e.demand >= MIN_ACTIVE then active[#active + 1] = e.weight end
      end
      start = virtual_start(now, book[me].vclock, window)
      book[me].vclock = virtual_advance(start, cost, client.weight, pool_rate,
        total(active, #active))
    end
    if cap and book[me].used + cost > cap then
      held = true
      fair_wait_s = fair_wait(book[me].used, cap, cost, window)
    end
  end
end

-- The queue: who is waiting ahead of this request? (as MemoryStore.acquire)
local qkey, tkey, ticket, order, ahead, ahead_cost = nil, nil, nil, 0, 0, 0
if queueing then
  qkey, tkey, ticket = KEYS[#KEYS - 1], KEYS[#KEYS], ARGV[10]
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
  if mine then
    order = tonumber(mine)
  elseif start then
    order = start - tonumber(ARGV[11])
  else
    order = now - tonumber(ARGV[11])
  end
  local before = redis.call('ZRANGEBYSCORE', qkey, '-inf', '(' .. fmt(order))
  ahead = #before
  for _, other in ipairs(before) do
    local info = redis.call('HGET', tkey, other)
    ahead_cost = ahead_cost + (info and tonumber(string.match(info, '%S+$')) or 0)
  end
end

local index = -1
if ahead == 0 and not held then index = pick(effs, levels, n, cost, r) end
if index > 0 then
  if queueing then
    redis.call('ZREM', qkey, ticket)
    redis.call('HDEL', tkey, ticket)
  end
  -- Only the chosen bucket is written: the others' refill is implied by their stamps.
  local b = buckets[index]
  b.tokens = b.tokens - cost
  b.requests = b.requests - 1
  b.granted = b.granted + cost
  save_grant(KEYS[index], b, now, ttl)
  if rkey then -- what release.lua gives back if the replica never saw this reply
    local what = string.format('%d', index) .. ' ' .. fmt(cost)
    if client then what = what .. ' ' .. ARGV[6] end
    redis.call('SET', rkey, what, 'EX', ARGV[9])
  end
  if not client then
    return { index, string.format('%d', b.failures), fmt(b.tokens), fmt(b.granted), fmt(now) }
  end
  if client.tokens_capacity > 0 then budget.tokens = budget.tokens - cost end
  if client.requests_capacity > 0 then budget.requests = budget.requests - 1 end
  budget.day_used = budget.day_used + cost
  budget.month_used = budget.month_used + cost
  save_budget(ckey, client, budget, now, ttl)
  if book then
    book[me].used = book[me].used + cost
    save_fair(fkey, book[me], now, ttl)
  end
  return { index, string.format('%d', b.failures), fmt(b.tokens), fmt(b.granted), fmt(now),
    fmt(budget.tokens), fmt(budget.requests), fmt(budget.day_used), fmt(budget.month_used) }
end

if book then save_fair(fkey, book[me], now, ttl) end
local reason = 'capacity'
local wait = retry_after(effs, levels, n, cost)
if held then
  reason = 'fair_share'
  wait = math.max(wait, fair_wait_s)
end
if not queueing then
  return { 0, fmt(wait), 0, 0, reason }
end
if ahead > 0 then
  wait = math.max(wait, queue_wait(ahead_cost, cost, effs, levels, n))
end
local allowed = tonumber(ARGV[12])
if allowed <= 0 then
  redis.call('ZREM', qkey, ticket)
  redis.call('HDEL', tkey, ticket)
  return { 0, fmt(wait), ahead, 0, reason }
end
redis.call('ZADD', qkey, fmt(order), ticket)
redis.call('HSET', tkey, ticket, fmt(now + allowed) .. ' ' .. string.format('%d', cost))
local keep = string.format('%d', math.max(ttl, math.ceil(allowed) + 1))
redis.call('EXPIRE', qkey, keep)
redis.call('EXPIRE', tkey, keep)
return { 0, fmt(wait), ahead, 1, reason }
