-- Give back a reservation whose replica never saw the reply (the call timed out or was
-- cancelled: a Redis stall, a client gone), exactly rather than by refill alone.
-- KEYS[1]   the reservation's record, KEYS[2..] the candidates' buckets as acquire had
--           them; with a client, its budget and the model's fair-share book last
-- ARGV      lease (seconds a record lives), ttl, the candidates' limits, the client's
--           limits ("" for none), its name
-- Returns   1 when a reservation was given back; 0 when there was none (the acquire
--           never ran, or did not reserve): a record "released" then refuses it if it
--           still arrives (acquire.lua), so it can never take what was given back.

local now = clock()
local rec = redis.call('GET', KEYS[1])
if rec == 'released' then return 0 end
redis.call('SET', KEYS[1], 'released', 'EX', ARGV[1])
if not rec then return 0 end
local index, cost = string.match(rec, '^(%d+) (%S+)')
index, cost = tonumber(index), tonumber(cost)
local limits = parse_limits(ARGV[3])
local key = KEYS[1 + index]
local b = load(key, limits[index], now)
b.tokens = math.min(b.tokens + cost, b.eff.tokens_capacity)
b.requests = math.min(b.requests + 1, b.eff.requests_capacity)
save(key, b, now, tonumber(ARGV[2]))
if ARGV[4] ~= '' then
  local c = parse_client(ARGV[4])
  local ckey, fkey = KEYS[#KEYS - 1], KEYS[#KEYS]
  local budget = load_budget(ckey, c, now)
  if c.tokens_capacity > 0 then
    budget.tokens = math.min(budget.tokens + cost, c.tokens_capacity)
  end
  if c.requests_capacity > 0 then
    budget.requests = math.min(budget.requests + 1, c.requests_capacity)
  end
  budget.day_used = math.max(0.0, budget.day_used - cost)
  budget.month_used = math.max(0.0, budget.month_used - cost)
  save_budget(ckey, c, budget, now, tonumber(ARGV[2]))
  if c.fair_window > 0 then
    local book, me = load_book(fkey, ARGV[5], now, c.fair_window)
    if me then
      book[me].used = math.max(0.0, book[me].used - cost)
      save_fair(fkey, book[me], now, tonumber(ARGV[2]))
    end
  end
end
return 1
